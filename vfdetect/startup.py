"""Importing TensorFlow quietly, in the foreground or in a thread beside a command's first work.

TensorFlow writes its C++ start-up notices (oneDNN, CUDA probing) to file descriptor 2 before its
log level applies, so ``TF_CPP_MIN_LOG_LEVEL`` alone does not hide them: the import runs with
descriptor 2 sent to /dev/null. In the background (``vfdetect predict``), the import overlaps with
reading and checking the scans, which need no TensorFlow; meanwhile Python's own ``sys.stderr``
writes to a copy of the real descriptor 2, so the command's messages still show.
:func:`finish_tensorflow_import` waits for it and puts everything back; the model loader calls it
first, and the command line calls it before exiting.

Numpy is imported before the thread starts: it is the one module both sides import, so neither
waits on the other's half-finished import.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

_PENDING: dict[str, Any] = {}


def _quiet_loggers() -> None:
    for name in ("tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


def import_tensorflow_quietly(background: bool = False) -> None:
    """Import TensorFlow with descriptor 2 sent to /dev/null, then silence its Python loggers.

    In the foreground an import error is raised after stderr is restored. With ``background``, the
    import runs in a daemon thread and :func:`finish_tensorflow_import` raises its error.
    """
    if "tensorflow" in sys.modules or _PENDING:
        _quiet_loggers()
        return
    import numpy  # noqa: F401  (see the module docstring)

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    if not background:
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        _quiet_loggers()
        return
    python_stderr = sys.stderr
    encoding = getattr(python_stderr, "encoding", None) or "utf-8"
    sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=encoding, errors="backslashreplace")  # noqa: SIM115
    errors: list[BaseException] = []

    def run() -> None:
        try:
            import tensorflow  # noqa: F401
        except BaseException as error:  # handed to the main thread by finish_tensorflow_import
            errors.append(error)

    thread = threading.Thread(target=run, name="vfdetect-import-tensorflow", daemon=True)
    _PENDING.update(thread=thread, saved=saved, stderr=python_stderr, replacement=sys.stderr, errors=errors)
    thread.start()


def finish_tensorflow_import(raise_error: bool = True) -> None:
    """Wait for a background import (if any), restore stderr, and raise its error (``raise_error``)."""
    if not _PENDING:
        return
    state = dict(_PENDING)
    _PENDING.clear()
    state["thread"].join()
    replacement = state["replacement"]
    replacement.flush()
    os.dup2(state["saved"], 2)
    os.close(state["saved"])
    if sys.stderr is replacement:
        sys.stderr = state["stderr"]
    replacement.close()
    _quiet_loggers()
    if state["errors"] and raise_error:
        raise state["errors"][0]


__all__ = ["finish_tensorflow_import", "import_tensorflow_quietly"]
