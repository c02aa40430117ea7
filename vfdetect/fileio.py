"""Atomic file writing: an interrupted run never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the full suffix of ``path`` (``.nii.gz`` included) so that writers
    that choose a format from the file name still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def check_writable_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that files can be written there; the folder.

    A probe file is created and removed, so that an unwritable folder (permissions, read-only
    file system, a full disk) stops a command before any computation rather than after it.
    Raises :class:`vfdetect.errors.InputError` naming the folder.
    """
    from vfdetect.errors import InputError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "output folder is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vfdetect-write-probe.", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        raise InputError(folder, f"cannot write to the output folder ({error.strerror or error})") from None
    return folder


def refuse_overwriting_inputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path | None]) -> None:
    """Raise :class:`vfdetect.errors.InputError` when an output path is (resolves to) one of the inputs.

    Paths are compared after resolving symbolic links, so a link or a ``..`` detour does not hide a
    clash; an input folder (a DICOM series) also protects every file inside it.
    """
    from vfdetect.errors import InputError

    protected: set[Path] = set()
    folders: list[Path] = []
    for given in inputs:
        if given is None:
            continue
        resolved = Path(given).resolve()
        if resolved.is_dir():
            folders.append(resolved)
        else:
            protected.add(resolved)
    for output in outputs:
        resolved = Path(output).resolve()
        if resolved in protected or any(resolved == folder or folder in resolved.parents for folder in folders):
            raise InputError(output, "this output would overwrite an input file; choose another output folder")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
