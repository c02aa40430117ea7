"""Exceptions raised by the library; only the command line turns them into exit codes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class VfdetectError(Exception):
    """Base class of every error vfdetect raises on purpose."""


class InputError(VfdetectError):
    """Bad input: names the offending file and what is wrong with it.

    ``str(error)`` is a single line ``"<path>: <problem>"`` suitable for a command-line message.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class MissingDependencyError(VfdetectError):
    """An optional package is needed and not installed; the message says what to install."""

    def __init__(self, package: str, purpose: str, pip_name: str | None = None) -> None:
        pip_name = pip_name or package
        super().__init__(f"{purpose} needs the package '{package}': install it with `pip install {pip_name}`")


def refuse_unknown_fields(
    config_class: type, values: Mapping[str, Any], what: str, error: type[VfdetectError] = VfdetectError
) -> None:
    """Raise ``error`` naming the keys of ``values`` that are not fields of the dataclass ``config_class``.

    Every settings dataclass read back from JSON uses this, so that a misspelt setting in a config
    file is an error rather than silently ignored.
    """
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise error(f"unknown {what}: {', '.join(unknown)}")
