"""Data for EM in pieces: in memory, a list of chunks, a ``DataLoader``, or a ``.npy`` file.

EM over chunks reads the data once per iteration and keeps only additive sums
(:mod:`.statistics`), so memory is bounded by the chunk size, not by the data.

Accepted by ``EM(...).fit(data)``:

- a tensor or array (N, D): in memory, one chunk (with optional ``sample_weight``);
- a list or tuple of 2-D tensors/arrays: one chunk each;
- a ``torch.utils.data.DataLoader`` (or any re-iterable) yielding tensors ``x`` (n_i, D),
  or tuples ``(x,)`` / ``(x, sample_weight)``;
- a path to a ``.npy`` file (``str`` or ``os.PathLike``), or a ``numpy.memmap``:
  memory-mapped and read ``chunk_size`` rows at a time.

Only stochastic EM accepts a one-shot iterator (a generator): batch EM needs to pass over the
same data on every iteration.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

#: rows read at a time from a memory-mapped file (8 MiB of float64 at D = 16)
DEFAULT_CHUNK_SIZE = 65_536

Chunk = tuple[torch.Tensor, torch.Tensor | None]


class DataSource:
    """Where one fit reads its data from; :meth:`chunks` starts a new pass."""

    #: the whole data as one tensor (None when read in chunks)
    x: torch.Tensor | None = None
    #: per-sample weights of in-memory data
    w: torch.Tensor | None = None
    #: whether a second pass is possible
    reiterable: bool = True

    def chunks(self) -> Iterator[tuple[object, object | None]]:
        """Raw (unvalidated) chunks ``(x_i, w_i)`` of one pass over the data."""
        raise NotImplementedError  # pragma: no cover - interface

    def first(self) -> tuple[object, object | None] | None:
        """The first raw chunk (None if there is none), still part of the next pass."""
        return next(iter(self.chunks()), None)

    @property
    def in_memory(self) -> bool:
        return self.x is not None


class InMemory(DataSource):
    """A validated tensor (N, D) and optional weights (N,): a single chunk."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor | None) -> None:
        self.x, self.w = x, w

    def chunks(self):
        yield self.x, self.w


class NpyFile(DataSource):
    """A ``.npy`` file (or a ``numpy.memmap``), memory-mapped, read ``chunk_size`` rows at a time.

    After each chunk is copied out, the mapped pages are released (``MADV_DONTNEED``), so
    the resident memory of a pass stays at one chunk however large the file.
    """

    def __init__(self, source, chunk_size: int) -> None:
        if isinstance(source, np.memmap):
            self.array = source
        else:
            path = Path(source)
            if not path.is_file():
                raise ValueError(f"no such file: {path}; pass the path of a .npy file")
            try:
                self.array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as error:
                raise ValueError(
                    f"{path} is not a readable .npy array ({error}); write it with numpy.save"
                ) from None
        if self.array.ndim != 2:
            raise ValueError(
                f"the array in the file must be 2-D (n_samples, n_features), got shape "
                f"{self.array.shape}; save it reshaped, e.g. x.reshape(len(x), -1)."
            )
        self.chunk_size = chunk_size

    def chunks(self):
        n = self.array.shape[0]
        for start in range(0, n, self.chunk_size):
            block = np.array(self.array[start : start + self.chunk_size])  # a private copy
            _release_pages(self.array)
            yield torch.from_numpy(block), None
        if n == 0:
            yield torch.from_numpy(np.array(self.array)), None  # reported as empty


def _release_pages(array: np.ndarray) -> None:
    """Drop this process's mapped pages of a memmap (they stay in the OS page cache)."""
    mm = getattr(array, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


class Chunks(DataSource):
    """A re-iterable (list, ``DataLoader``, ...) or, for one pass only, an iterator."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable
        self.reiterable = iter(iterable) is not iterable
        self._held: list = []  # a one-shot iterator's first item, read early by first()

    def first(self):
        if self.reiterable:
            return super().first()
        if not self._held:
            self._held = _take_one(self.iterable)
        return _split(self._held[0]) if self._held else None

    def chunks(self):
        held, self._held = self._held, []
        for item in held:  # the item first() read comes first in the pass
            yield _split(item)
        for item in self.iterable:
            yield _split(item)


def _take_one(iterator: Iterator) -> list:
    """[the next item] or [] when the iterator is exhausted."""
    for item in iterator:
        return [item]
    return []


def _split(item) -> tuple[object, object | None]:
    """A chunk ``x`` or ``(x,)`` or ``(x, w)`` as ``(x, w)``."""
    if isinstance(item, (tuple, list)) and len(item) in (1, 2) and _is_matrix(item[0]):
        return item[0], item[1] if len(item) == 2 else None
    return item, None


def _is_matrix(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 2


def is_chunked(data) -> bool:
    """Whether ``fit`` should read ``data`` in chunks rather than as one array."""
    if isinstance(data, (str, os.PathLike, np.memmap)):
        return True
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return False
    if isinstance(data, (list, tuple)):
        return len(data) > 0 and all(_is_matrix(item) for item in data)
    if isinstance(data, torch.utils.data.DataLoader):
        return True
    return isinstance(data, Iterable) and not hasattr(data, "__array__")


def chunked_source(data, chunk_size: int) -> DataSource:
    """The :class:`DataSource` for chunked ``data`` (see :func:`is_chunked`)."""
    if isinstance(data, (str, os.PathLike, np.memmap)):
        return NpyFile(data, chunk_size)
    return Chunks(data)
