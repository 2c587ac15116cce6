"""Owns the check that a caller may start decoding workers: its script's code is under `if __name__ == "__main__":`.

The workers are forked from a forkserver, and each one first runs the calling script again (as `__mp_main__`)
so that what the script defines can be unpickled. A script whose code is not behind the guard would curate
again inside every worker, writing into the same store, before multiprocessing's own check kills the worker
and the pool breaks with an opaque BrokenProcessPool. So the parent looks first and refuses with what to do.
"""

from __future__ import annotations

import ast
import multiprocessing
import sys
from pathlib import Path

ADVICE = ('A script that curates with decoding workers must keep its code under `if __name__ == "__main__":` '
          "(each worker imports the script again), or set curate.workers: 0 to decode in the calling process.")


class MainGuardError(RuntimeError):
    """The calling script would run again in every worker; the message says what to do."""


def check_main_guard() -> None:
    """Raise MainGuardError when the main script calls us from code outside its `__main__` guard."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # we are a worker re-running the script
        raise MainGuardError(f"curation started inside a decoding worker while it imported the main script. {ADVICE}")
    where = unguarded_call()
    if where:
        raise MainGuardError(f"{where} starts decoding workers outside `if __name__ == \"__main__\":`. {ADVICE}")


def unguarded_call() -> str | None:
    """'script.py:LINE' of the main script's top-level statement on our stack when it is not the guard, else None."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    # what multiprocessing itself re-runs in a worker: a script (by path) or a module run with -m, except
    # package __main__ modules (never re-run); -c and interactive sessions have no file and are never re-run
    if path is None or name == "__main__" or name.endswith(".__main__"):
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:  # called from a thread or after the script ended: nothing top-level re-runs us
        return None
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    line = frame.f_lineno
    for node in tree.body:
        if node.lineno <= line <= (node.end_lineno or node.lineno):
            return None if _is_main_guard(node) else f"{path}:{line}"
    return None


def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If):
        return False
    for cmp in ast.walk(node.test):
        if isinstance(cmp, ast.Compare):
            operands = [cmp.left, *cmp.comparators]
            if any(isinstance(o, ast.Name) and o.id == "__name__" for o in operands) and \
                    any(isinstance(o, ast.Constant) and o.value == "__main__" for o in operands):
                return True
    return False
