"""MNIST from local IDX files, and the IDX format itself.

The IDX format (LeCun et al.) is a big-endian header -- two zero bytes, a dtype code
(0x08 unsigned byte, 0x09 signed byte, 0x0B short, 0x0C int, 0x0D float, 0x0E double), the
number of dimensions, then one big-endian uint32 size per dimension -- followed by the data,
big-endian, in C order.

:func:`load_mnist` reads the four standard files from a folder (gzipped or not) and never
touches the network; :func:`download_mnist` fetches them once, when a network is available.
"""

from __future__ import annotations

import gzip
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the package imports this module before it defines Dataset
    from . import Dataset

#: IDX dtype code -> numpy dtype (big-endian, as stored).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"

#: The file names of each split, as published (``.gz`` appended when compressed).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_GZ_FILES: tuple[str, ...] = tuple(f"{n}.gz" for pair in MNIST_FILES.values() for n in pair)
DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


class DownloadError(OSError):
    """A file could not be fetched (no network, a missing file, or not an IDX file)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not; detected from its first bytes) into an array.

    Returns an array of the stored shape, e.g. (N, 28, 28) uint8 for MNIST images, in native
    byte order. Raises :class:`ValueError` naming the file when the magic number is wrong,
    the file is truncated or has bytes beyond the data, or the gzip stream is corrupt.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e}); download it again") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file, {len(raw)} bytes, shorter than the header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file, bad magic number 0x{raw[:4].hex()} (expected two zero "
            f"bytes, a dtype code in {{{', '.join(f'0x{c:02X}' for c in IDX_DTYPES)}}} and "
            f"the number of dimensions)"
        )
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX file, {len(raw)} bytes, shorter than its {header}-byte "
            f"header for {ndim} dimensions"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated IDX file" if got < expected else "size mismatch"
        raise ValueError(
            f"{path}: {what}: header says shape {shape} of {dtype.newbyteorder('=').name} "
            f"({expected} data bytes) but the file holds {got} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (any shape, at most 255 dimensions) as an IDX file; gzip if ``.gz``.

    ``array`` must be uint8, int8, int16, int32, float32 or float64 (the IDX types). The
    file is written to a temporary name and renamed, so it is never seen half-written.
    Returns the path written.
    """
    path = Path(path)
    arr = np.asarray(array)
    native = arr.dtype.newbyteorder("=")
    if native not in _CODES:
        raise ValueError(
            f"cannot write {arr.dtype} to IDX file {path}; IDX holds uint8, int8, int16, int32, "
            f"float32 or float64: convert first, e.g. array.astype(np.uint8)"
        )
    if arr.ndim > 255 or any(s >= 2**32 for s in arr.shape):
        raise ValueError(
            f"cannot write shape {arr.shape} to IDX file {path}; IDX allows at most 255 "
            f"dimensions of fewer than 2**32 entries each"
        )
    code = _CODES[native]
    payload = (
        bytes([0, 0, code, arr.ndim])
        + np.asarray(arr.shape, dtype=">u4").tobytes()
        + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    )
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    _atomic_write(path, lambda f: f.write(payload))
    return path


def load_mnist(
    folder: str | os.PathLike,
    split: str = "train",
    binarize: bool = False,
    limit: int | None = None,
) -> Dataset:
    """MNIST handwritten digits from the IDX files in ``folder`` (no network).

    Reads ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (``split="train"``,
    60000 images) or ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
    (``split="test"``, 10000 images), each optionally gzipped (``.gz``); fetch them with
    :func:`download_mnist`. Returns a :class:`Dataset` with ``data`` (N, 784) float64 --
    the 28x28 images flattened row by row, raw pixel values 0..255 (not scaled) -- or 0/1
    with ``binarize=True`` (1 where the pixel is >= 128), and ``target`` (N,) int64 labels
    0..9. ``limit`` keeps only the first ``limit`` images (all of them if fewer).
    """
    from . import Dataset

    if split not in MNIST_FILES:
        raise ValueError(f"unknown MNIST split {split!r}; choose 'train' or 'test'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    folder = Path(folder)
    images_path, labels_path = (_find(folder, name) for name in MNIST_FILES[split])

    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected images (N, rows, cols) of uint8, got shape "
            f"{images.shape} of {images.dtype}; is this an images file?"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{labels_path}: expected labels (N,) of uint8, got shape {labels.shape} of "
            f"{labels.dtype}; is this a labels file?"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"size mismatch: {images_path} holds {images.shape[0]} images but {labels_path} "
            f"holds {labels.shape[0]} labels; the two files must come from the same split"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]

    n, rows, cols = images.shape
    data = torch.from_numpy(images.reshape(n, rows * cols)).to(torch.float64)
    if binarize:
        data = (data >= 128).to(torch.float64)
    return Dataset(
        data,
        torch.from_numpy(labels.astype(np.int64)),
        [f"pixel_{r}_{c}" for r in range(rows) for c in range(cols)],
        f"MNIST handwritten digits, {rows}x{cols}, {split} split (LeCun, Cortes & Burges), "
        f"from {folder}",
    )


def download_mnist(
    folder: str | os.PathLike,
    base_url: str = DEFAULT_MIRROR,
    overwrite: bool = False,
    timeout: float = 60.0,
) -> list[Path]:
    """Fetch the four gzipped MNIST IDX files from ``base_url`` into ``folder``.

    Files already in ``folder`` are kept unless ``overwrite=True``. Each file is streamed to
    a temporary file in ``folder``, checked to be a valid IDX file, then renamed into place,
    so ``folder`` never holds a half-written file. ``base_url`` may be any URL urllib opens
    (``https://``, ``file://``). Returns the paths of the four files. Raises
    :class:`DownloadError` (an :class:`OSError`) when a file cannot be fetched, e.g. with no
    network; the message names the files to download by hand instead.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"
    paths = []
    for name in MNIST_GZ_FILES:
        dest = folder / name
        paths.append(dest)
        if dest.exists() and not overwrite:
            continue
        url = base + name

        def fetch(f, url=url):
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, f)

        def check(tmp, url=url):
            try:
                read_idx(tmp)
            except ValueError as e:
                raise DownloadError(
                    f"{url} is not a valid IDX file ({e}); the mirror may have served an "
                    f"error page. {_by_hand(folder, base)}"
                ) from e

        try:
            _atomic_write(dest, fetch, check)
        except DownloadError:
            raise
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
            reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
            raise DownloadError(
                f"could not download {url}: {reason}. {_by_hand(folder, base)}"
            ) from e
    return paths


def _by_hand(folder: Path, base: str) -> str:
    return (
        f"If this machine cannot reach {base} (no network, or the mirror has moved), "
        f"download the four files {', '.join(MNIST_GZ_FILES)} by hand from any MNIST mirror "
        f"into {folder} (or pass another base_url); load_mnist reads them gzipped or not"
    )


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    expected = ", ".join(f"{n}[.gz]" for pair in MNIST_FILES.values() for n in pair)
    raise FileNotFoundError(
        f"MNIST file {name} (or {name}.gz) not found in {folder}; the folder should hold "
        f"{expected}. Fetch them with elbolab.datasets.download_mnist({str(folder)!r})"
    )


def _atomic_write(path: Path, write, check=None) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, ``check(tmp)``, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if check is not None:
            check(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private to its owner; data files are not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "DEFAULT_MIRROR",
    "MNIST_FILES",
    "DownloadError",
    "download_mnist",
    "load_mnist",
    "read_idx",
    "write_idx",
]
