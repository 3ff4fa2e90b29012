"""Command lines run in this test process: ``python -m align.run ARGS`` as ``align.run.main(ARGS)``, with what it
prints captured and its exit status as a return code, so that a test pays for the run and not for a new Python
that imports torch (≈ 8 s a process on two shared cores).

What only a real process shows (the ``-m`` entry, ``sys.exit`` reaching the shell, signals, locks held by another
process, plugins loaded through ``ALIGN_PLUGINS``) keeps real subprocesses: tests/test_cli.py (align.run),
tests/test_sweep.py and tests/test_run_safety.py (align.sweep and its runs), tests/test_bench.py (align.bench),
tests/test_add_algorithm.py and tests/test_paper_settings.py (plugins)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@dataclass
class Result:
    """What the shell would see: the exit status and the two streams."""
    returncode: int
    stdout: str
    stderr: str


def _exit_code(code: object) -> int:
    """``sys.exit(code)``'s status as the shell sees it (None → 0, an int → itself, anything else printed → 1)."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run_main(main: Callable[[list[str]], object], argv: Sequence[str], cwd: str | os.PathLike | None = None,
             env: dict[str, str] | None = None) -> Result:
    """``main(argv)`` with stdout/stderr captured, in ``cwd`` and with ``env`` added to the environment (both
    restored afterwards, as is ``sys.argv``, which Hydra's entry point rewrites). Warnings are printed to stderr as
    a new interpreter's default filters would (pytest would otherwise record them). An uncaught exception is a
    failure of the test, not an exit status: the command line never shows a traceback."""
    out, err = io.StringIO(), io.StringIO()
    argv_before, cwd_before = list(sys.argv), os.getcwd()
    env_before = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    code: object = None
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            _interpreter_warning_filters()
            try:
                code = main(list(argv))
            except SystemExit as exit_:
                code = exit_.code
    finally:
        sys.argv[:] = argv_before
        os.chdir(cwd_before)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(_exit_code(code), out.getvalue(), err.getvalue())


def _interpreter_warning_filters() -> None:
    """Python's default warning filters (``python -m`` shows a UserWarning once per place, hides deprecations in
    library code), printing to the current sys.stderr."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def align_run(*argv: str, cwd: str | os.PathLike | None = None) -> Result:
    """``python -m align.run ARGV`` in this process."""
    from align.run import main

    return run_main(main, argv, cwd=cwd)


def subprocess_run(module: str, argv: Sequence[str], cwd: str | os.PathLike | None = None,
                   env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGV`` in a new process (one thread, offline)."""
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
