"""The IDX format and MNIST, on small files written by the tests (no network)."""

from __future__ import annotations

import gzip
import io
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from elbolab.datasets import DownloadError, download_mnist, load_mnist, read_idx, write_idx
from elbolab.datasets.mnist import MNIST_GZ_FILES

# ------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 3, 5), (1, 2, 1, 3)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        a = rng.normal(size=shape).astype(dtype) * 1e3
    path = write_idx(tmp_path / f"a.idx{suffix}", a)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.shape == shape
    np.testing.assert_array_equal(a, b)
    assert b.dtype.isnative and b.flags.writeable
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_idx_bytes_are_the_published_format(tmp_path):
    path = write_idx(tmp_path / "a", np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    path = write_idx(tmp_path / "b", np.array([0x0102, -2], dtype=np.int16))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 1, 2, 0xFF, 0xFE])


def test_reads_a_hand_made_big_endian_file(tmp_path):
    header = bytes([0, 0, 0x0E, 2, 0, 0, 0, 1, 0, 0, 0, 2])
    (tmp_path / "d").write_bytes(header + np.array([1.5, -2.25], dtype=">f8").tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "d"), [[1.5, -2.25]])
    # gzip is detected from the content, whatever the file is called
    (tmp_path / "e").write_bytes(gzip.compress(header + np.array([7.0, 8.0], ">f8").tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "e"), [[7.0, 8.0]])


def test_write_idx_accepts_other_byte_orders_and_refuses_other_types(tmp_path):
    a = np.array([1, -70000, 3], dtype=">i4")
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", a)), [1, -70000, 3])
    for bad in (np.arange(3), np.array([True]), np.zeros(2, np.uint16)):
        with pytest.raises(ValueError, match=r"IDX holds uint8, .*astype"):
            write_idx(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()


def _corrupt(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


GOOD = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01" + GOOD[1:], "not an IDX file, bad magic number 0x01000802"),
        (GOOD[:2] + b"\x0a" + GOOD[3:], "not an IDX file, bad magic number 0x00000a02"),
        (b"<html>Not Found</html>", "not an IDX file, bad magic number 0x3c68746d"),
        (b"", "truncated IDX file, 0 bytes"),
        (GOOD[:3], "truncated IDX file, 3 bytes"),
        (GOOD[:9], "truncated IDX file, 9 bytes, shorter than its 12-byte header"),
        (
            GOOD[:-1],
            r"truncated IDX file: header says shape \(2, 3\) of uint8 \(6 data bytes\) "
            r"but the file holds 5",
        ),
        (GOOD + b"\x00", r"size mismatch: header says shape \(2, 3\) .* holds 7 data bytes"),
        (gzip.compress(GOOD)[:-6], "corrupt gzip stream"),
        (gzip.compress(GOOD[:-2]), "truncated IDX file"),
    ],
)
def test_corrupt_files_raise_naming_the_file(tmp_path, content, message):
    path = _corrupt(tmp_path, "broken-idx3-ubyte", content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        read_idx(path)


# ----------------------------------------------------------------------------------- MNIST


def fake_mnist(folder: Path, n_train: int = 10, n_test: int = 4) -> dict[str, np.ndarray]:
    """Write a tiny MNIST to ``folder``: train gzipped, test not; returns the arrays."""
    rng = np.random.default_rng(42)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    arrays["train-images-idx3-ubyte.gz"][0, 0, :3] = [127, 128, 255]  # around the threshold
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(folder / name, a)
    return arrays


def test_load_mnist_shapes_values_and_labels(tmp_path):
    arrays = fake_mnist(tmp_path)
    train = load_mnist(tmp_path)
    assert train.data.shape == (10, 784) and train.data.dtype == torch.float64
    images = arrays["train-images-idx3-ubyte.gz"]
    np.testing.assert_array_equal(train.data.numpy(), images.reshape(10, 784).astype(float))
    assert train.data[0, :3].tolist() == [127.0, 128.0, 255.0]  # raw 0..255, not scaled
    assert train.target.dtype == torch.int64 and train.target.tolist() == list(range(10))
    assert train.feature_names[:2] == ["pixel_0_0", "pixel_0_1"]
    assert train.feature_names[-1] == "pixel_27_27" and len(train.feature_names) == 784
    assert "MNIST" in train.description and "train" in train.description

    test = load_mnist(tmp_path, split="test")  # the uncompressed files
    assert test.data.shape == (4, 784) and test.target.tolist() == [0, 3, 6, 9]
    np.testing.assert_array_equal(
        test.data.numpy(), arrays["t10k-images-idx3-ubyte"].reshape(4, 784)
    )


def test_load_mnist_binarize_and_limit(tmp_path):
    arrays = fake_mnist(tmp_path)
    b = load_mnist(tmp_path, binarize=True, limit=3)
    assert b.data.shape == (3, 784) and b.target.tolist() == [0, 1, 2]
    assert set(b.data.unique().tolist()) == {0.0, 1.0}
    assert b.data[0, :3].tolist() == [0.0, 1.0, 1.0]  # 127 -> 0, 128 -> 1
    expected = (arrays["train-images-idx3-ubyte.gz"][:3] >= 128).reshape(3, 784)
    np.testing.assert_array_equal(b.data.numpy(), expected.astype(float))
    assert load_mnist(tmp_path, limit=100).data.shape == (10, 784)  # fewer than limit: all


def test_load_mnist_prefers_either_compression(tmp_path):
    arrays = fake_mnist(tmp_path)
    # a folder with gunzipped train files reads the same
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (plain / name).write_bytes(gzip.decompress((tmp_path / f"{name}.gz").read_bytes()))
    a, b = load_mnist(plain), load_mnist(tmp_path)
    assert torch.equal(a.data, b.data) and torch.equal(a.target, b.target)
    assert a.data.shape[0] == len(arrays["train-labels-idx1-ubyte.gz"])


def test_load_mnist_refuses_bad_arguments(tmp_path):
    fake_mnist(tmp_path)
    with pytest.raises(ValueError, match="unknown MNIST split 'val'; choose 'train' or 'test'"):
        load_mnist(tmp_path, split="val")
    for limit in (0, -1, 2.5):
        with pytest.raises(ValueError, match="limit must be a positive int"):
            load_mnist(tmp_path, limit=limit)


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path / "nowhere")
    text = str(info.value)
    assert "train-images-idx3-ubyte" in text and "download_mnist" in text
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in text
    fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte \(or .*\.gz\) not found"):
        load_mnist(tmp_path, split="test")
    load_mnist(tmp_path, split="train")  # the other split is still fine


def test_mismatched_or_swapped_files_are_refused(tmp_path):
    fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="size mismatch: .* holds 4 images but .* holds 5 labels"):
        load_mnist(tmp_path, split="test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: expected labels \(N,\)"):
        load_mnist(tmp_path, split="test")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 784), np.float32))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: expected images"):
        load_mnist(tmp_path, split="test")


def test_corrupt_mnist_file_names_the_file(tmp_path):
    fake_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": truncated IDX file"):
        load_mnist(tmp_path)


# -------------------------------------------------------------------------------- download


@pytest.fixture
def mirror(tmp_path) -> Path:
    """A folder holding the four .gz files, as a mirror would serve them."""
    src = tmp_path / "mirror"
    arrays = fake_mnist(src / "raw")
    for name in MNIST_GZ_FILES:
        plain = name.removesuffix(".gz")
        a = arrays.get(name, arrays.get(plain))
        write_idx(src / name, a)
    return src


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in MNIST_GZ_FILES)


def test_download_from_a_file_url(tmp_path, mirror):
    dest = tmp_path / "data" / "mnist"  # created on demand
    paths = download_mnist(dest, base_url=mirror.as_uri())  # no trailing slash: added
    assert [p.name for p in paths] == list(MNIST_GZ_FILES)
    for p in paths:
        assert p.read_bytes() == (mirror / p.name).read_bytes()
    assert leftovers(dest) == []
    train, test = load_mnist(dest), load_mnist(dest, split="test")
    assert train.data.shape == (10, 784) and test.data.shape == (4, 784)
    assert torch.equal(train.data, load_mnist(mirror / "raw").data)


def test_download_keeps_existing_files_unless_overwrite(tmp_path, mirror):
    dest = tmp_path / "dest"
    download_mnist(dest, base_url=mirror.as_uri() + "/")
    labels = dest / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.full(10, 9, np.uint8))
    download_mnist(dest, base_url=mirror.as_uri())
    assert load_mnist(dest).target.tolist() == [9] * 10  # kept
    download_mnist(dest, base_url=mirror.as_uri(), overwrite=True)
    assert labels.read_bytes() == (mirror / labels.name).read_bytes()  # replaced
    assert leftovers(dest) == []


def test_a_missing_remote_file_raises_and_leaves_no_partial_file(tmp_path, mirror):
    (mirror / "train-labels-idx1-ubyte.gz").unlink()
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as info:
        download_mnist(dest, base_url=mirror.as_uri())
    text = str(info.value)
    assert "could not download" in text and "train-labels-idx1-ubyte.gz" in text
    assert "download the four files" in text and str(dest) in text
    assert all(name in text for name in MNIST_GZ_FILES)
    assert isinstance(info.value, OSError)
    # the file before it arrived whole; nothing else, not even a temporary file
    assert sorted(p.name for p in dest.iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_no_network_raises_the_clear_error(tmp_path, monkeypatch):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="Network is unreachable") as info:
        download_mnist(dest)
    text = str(info.value)
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in text
    assert "by hand" in text and all(name in text for name in MNIST_GZ_FILES)
    assert list(dest.iterdir()) == []


class _Dropping(io.BytesIO):
    """A response that sends some bytes, then loses the connection."""

    def read(self, size=-1):
        if self.tell() > 0:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(4)


def test_a_dropped_connection_leaves_the_old_file_intact(tmp_path, mirror, monkeypatch):
    dest = tmp_path / "dest"
    download_mnist(dest, base_url=mirror.as_uri())
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Dropping(b"x" * 99))
    with pytest.raises(DownloadError, match="Connection reset by peer"):
        download_mnist(dest, base_url=mirror.as_uri(), overwrite=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_an_error_page_is_not_saved(tmp_path, mirror):
    (mirror / "t10k-images-idx3-ubyte.gz").write_bytes(b"<html>Access Denied</html>")
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="t10k-images-idx3-ubyte.gz is not a valid IDX file"):
        download_mnist(dest, base_url=mirror.as_uri())
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_GZ_FILES[:2])
