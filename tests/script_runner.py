"""
Runs ``python3 <script> ARGS`` and ``python3 -c CODE`` commands as the interpreter would, each in
a process of its own, for a fraction of the start-up time: this process imports torch,
detectron2 and retinamask_d2 once, then forks a child per command, which changes to the
command's directory and environment, redirects its output to files and runs the script as
``__main__`` (``runpy``), with ``sys.argv`` and ``sys.path[0]`` as ``python3`` sets them. An
uncaught exception prints its traceback and exits 1, ``sys.exit("text")`` prints the text and
exits 1, as the interpreter does.

Protocol: one JSON request per line on stdin, ``{"argv": [...], "cwd": DIR, "env": {...},
"timeout": SECONDS}`` (``argv`` without the interpreter: ``[script, *args]`` or ``["-c",
code]``); one JSON line back, ``{"returncode", "stdout", "stderr"}``. A command that runs past
its timeout is killed by SIGALRM (returncode -14).

The environment this runner starts with must be the commands' own, less the variables they
set per command: modules read some variables (DETECTRON2_DATASETS) once, on import.
"""

import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback


def _import_what_the_scripts_import():
    # Imported once here, so that each command's child starts with them.
    import detectron2.checkpoint  # noqa: F401
    import detectron2.data  # noqa: F401
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.modeling  # noqa: F401
    import retinamask_d2.engine  # noqa: F401
    import retinamask_d2.export  # noqa: F401
    import retinamask_d2.model_zoo  # noqa: F401
    import retinamask_d2.original  # noqa: F401
    import retinamask_d2.visualization  # noqa: F401


def _exit_status(code) -> int:
    # What the interpreter does with SystemExit(code).
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(request, stdout_path, stderr_path):
    for fd, path, mode in ((0, os.devnull, "rb"), (1, stdout_path, "wb"), (2, stderr_path, "wb")):
        with open(path, mode) as f:
            os.dup2(f.fileno(), fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.alarm(int(request.get("timeout", 300)))
    argv = request["argv"]
    status = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main():
    _import_what_the_scripts_import()
    protocol = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryDirectory() as directory:
            paths = [os.path.join(directory, name) for name in ("stdout", "stderr")]
            protocol.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, *paths)
            _, status = os.waitpid(pid, 0)
            output = []
            for path in paths:
                with open(path, "rb") as f:
                    output.append(f.read().decode("utf-8", "replace"))
        returncode = os.waitstatus_to_exitcode(status)
        answer = dict(returncode=returncode, stdout=output[0], stderr=output[1])
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()


class ScriptRunner:
    """
    The client: ``with ScriptRunner(env) as runner: runner.run(argv, cwd, env)`` returns a
    ``subprocess.CompletedProcess`` as ``subprocess.run([python3, *argv], ...)`` would.
    """

    def __init__(self, env):
        self._env = env
        self._cache = {}

    def __enter__(self):
        self._log = tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, env=self._env, text=True,
        )  # fmt: skip
        return self

    def __exit__(self, *exc):
        self._process.stdin.close()
        self._process.wait(timeout=60)
        self._log.close()

    def run(self, argv, cwd, env, timeout=300, cache=False):
        key = (tuple(argv), cwd, tuple(sorted(env.items())))
        if cache and key in self._cache:
            return self._cache[key]
        request = dict(argv=list(argv), cwd=str(cwd), env=env, timeout=timeout)
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        if not answer:
            self._log.seek(0)
            raise RuntimeError(f"the script runner stopped:\n{self._log.read()[-3000:]}")
        answer = json.loads(answer)
        result = subprocess.CompletedProcess(
            ["python3", *argv], answer["returncode"], answer["stdout"], answer["stderr"]
        )
        if cache:
            self._cache[key] = result
        return result


if __name__ == "__main__":
    main()
