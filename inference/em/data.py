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
    #: lengths (S,) of the sequences of in-memory frames (sequence models), else None
    lengths: torch.Tensor | None = None
    #: whether a second pass is possible
    reiterable: bool = True

    def chunks(self) -> Iterator[tuple[object, object | None]]:
        """Raw (unvalidated) chunks ``(x_i, w_i)`` of one pass over the data."""
        raise NotImplementedError  # pragma: no cover - interface

    def first(self) -> tuple[object, object | None] | None:
        """The first raw chunk (None if there is none), still part of the next pass."""
        return next(iter(self.chunks()), None)

    #: rows, when any row can be read directly (:meth:`rows`); None otherwise
    n_rows: int | None = None

    def rows(self, index: np.ndarray) -> tuple[object, object | None]:
        """Raw rows ``index`` (sorted, over the whole data) as ``(x, w)``."""
        raise NotImplementedError  # pragma: no cover - only where n_rows is set

    @property
    def in_memory(self) -> bool:
        return self.x is not None


class InMemory(DataSource):
    """A validated tensor (N, D), optional weights (N,) and, for sequence models, the
    lengths (S,) of the sequences whose frames it holds: a single chunk."""

    def __init__(
        self, x: torch.Tensor, w: torch.Tensor | None, lengths: torch.Tensor | None = None
    ) -> None:
        self.x, self.w, self.lengths = x, w, lengths

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
            if not isinstance(self.array, np.ndarray):  # an .npz archive of several arrays
                self.array.close()
                raise ValueError(
                    f"{path} is an .npz archive, not one array; save the array to fit with "
                    "numpy.save(path, x) as a .npy file (an archive cannot be memory-mapped)"
                )
        if self.array.ndim != 2:
            raise ValueError(
                f"the array in the file must be 2-D (n_samples, n_features), got shape "
                f"{self.array.shape}; save it reshaped, e.g. x.reshape(len(x), -1)."
            )
        self.chunk_size = chunk_size
        self.n_rows = self.array.shape[0]
        self._gathered = 0

    def rows(self, index):
        block = np.asarray(self.array[index])  # fancy indexing: a private copy
        self._gathered += len(index)
        if self._gathered >= self.chunk_size:  # the pages touched so far: about one chunk
            _release_pages(self.array)
            self._gathered = 0
        return torch.from_numpy(block), None

    def chunks(self):
        n = self.array.shape[0]
        for start in range(0, n, self.chunk_size):
            block = np.array(self.array[start : start + self.chunk_size])  # a private copy
            _release_pages(self.array)
            yield torch.from_numpy(block), None
        if n == 0:
            yield torch.from_numpy(np.array(self.array)), None  # reported as empty


class SequenceFile(NpyFile):
    """The frames of several sequences in a ``.npy`` file (their ``lengths`` (S,) given),
    read a few whole sequences at a time: a chunk holds the sequences that start in the
    next ``chunk_size`` rows, so a sequence is never cut."""

    def __init__(self, source, chunk_size: int, lengths: torch.Tensor) -> None:
        super().__init__(source, chunk_size)
        self.lengths = lengths
        self.n_rows = None  # minibatches are drawn by whole sequences, not by rows

    def sequence_chunks(self):
        """``(x, lengths)`` of each chunk of whole sequences."""
        ends = np.cumsum(self.lengths.numpy())
        starts = ends - self.lengths.numpy()
        first = 0
        while first < len(starts):
            last = int(np.searchsorted(starts, starts[first] + self.chunk_size, "left"))
            last = max(last, first + 1)
            lo, hi = int(starts[first]), int(ends[last - 1])
            block = np.array(self.array[lo:hi])  # a private copy
            _release_pages(self.array)
            yield torch.from_numpy(block), self.lengths[first:last]
            first = last

    def chunks(self):
        for x, _ in self.sequence_chunks():
            yield x, None


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
        if isinstance(iterable, (list, tuple)):  # all in memory: any row can be read
            self._parts = [_split(item) for item in iterable]
            try:
                self._offsets = np.cumsum([0] + [len(x) for x, _ in self._parts])
                self.n_rows = int(self._offsets[-1])
            except TypeError:  # not arrays: the checks of the first pass will say so
                self.n_rows = None

    def rows(self, index):
        """Rows of several chunks: each chunk's share of ``index``, concatenated."""
        cut = np.searchsorted(index, self._offsets)  # index[cut[i]:cut[i+1]] lie in chunk i
        xs, ws = [], []
        for i, (x, w) in enumerate(self._parts):
            local = index[cut[i] : cut[i + 1]] - self._offsets[i]
            if len(local):
                take = torch.as_tensor(local)
                xs.append(x[take] if torch.is_tensor(x) else torch.as_tensor(np.asarray(x)[local]))
                ws.append(torch.ones(len(local)) if w is None else torch.as_tensor(w)[take])
        weighted = any(w is not None for _, w in self._parts)
        return torch.cat(xs), torch.cat([w.double() for w in ws]) if weighted else None

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
    if _is_pair(item):
        return item[0], item[1] if len(item) == 2 else None
    return item, None


def _is_matrix(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 2


def _is_pair(item) -> bool:
    """``(x,)`` or ``(x, w)`` with a 2-D ``x``."""
    return isinstance(item, (tuple, list)) and len(item) in (1, 2) and _is_matrix(item[0])


def is_chunked(data) -> bool:
    """Whether ``fit`` should read ``data`` in chunks rather than as one array."""
    if isinstance(data, (str, os.PathLike, np.memmap)):
        return True
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return False
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            return False
        if all(_is_matrix(item) or _is_pair(item) for item in data):
            return True
        # arrays of different shapes are no (N, D) array: read them as chunks (and say why not)
        arrays = all(isinstance(item, (torch.Tensor, np.ndarray)) for item in data)
        return arrays and len({tuple(item.shape) for item in data}) > 1
    if isinstance(data, torch.utils.data.DataLoader):
        return True
    return isinstance(data, Iterable) and not hasattr(data, "__array__")


def chunked_source(data, chunk_size: int) -> DataSource:
    """The :class:`DataSource` for chunked ``data`` (see :func:`is_chunked`)."""
    if isinstance(data, (str, os.PathLike, np.memmap)):
        return NpyFile(data, chunk_size)
    return Chunks(data)
