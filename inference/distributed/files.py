"""Writes that never leave a half-written file: a temporary file, then an atomic rename."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .collectives import agree, rank


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in its folder and ``os.replace``.

    Readers see the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj: Any, path: str | os.PathLike, lines: bool = False) -> None:
    """Write ``obj`` as JSON (or each item of ``obj`` as one JSON line) atomically."""
    text = "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=2)
    _atomic_write(path, lambda f: f.write(text.encode()))


def _write_results(files: dict[Any, Callable[[Path], None]], what: str) -> None:
    """Rank 0 writes each file (keys: paths; None is skipped); every rank learns the outcome."""
    error = None
    if rank() == 0:
        try:
            for path, write in files.items():
                if path is not None:
                    write(Path(path))
        except OSError as e:
            error = OSError(
                f"cannot write {e.filename or 'the results'}: {e.strerror or e}; free disk "
                "space or choose another folder"
            )
    agree(error, what)


def check_output_folder(
    path: str | os.PathLike, files: tuple[str, ...] = (), what: str = "--out"
) -> None:
    """``ValueError`` naming the fix unless ``path`` is, or can become, a writable folder.

    Run before any fit, so that no run's results are lost at the end: refused are an
    existing file at ``path``, a parent that is a file, a place this process may not write
    (tried for real: the missing folders are created and a temporary file is written in
    ``path``), and an existing folder where one of ``files`` is to be written. Whatever
    the check created is removed again, so a run that stops later leaves nothing behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"{what} {path} is an existing file, not a folder; pass a folder (it is created "
            "if missing), or move the file away"
        )
    missing, parent = [], path
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(
            f"cannot create {what} {path}: {parent} is a file, not a folder; pass a folder "
            "path whose parents are folders"
        )
    for name in files:
        if (path / name).is_dir():
            raise ValueError(
                f"{what} {path} holds a folder {name}, where a result file of that name is "
                f"to be written; remove {path / name} or pass another {what}"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".write-check-", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(
            f"cannot write to {what} {path} ({error.strerror or error}); pass a folder this "
            "process can write to"
        ) from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
