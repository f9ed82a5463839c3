"""Fashion-MNIST from local IDX files (no download, never random stand-ins).

The files are looked up, in order, in

1. the ``root`` argument of :func:`load_fashion_mnist`,
2. the directory in the environment variable ``VBPC_FASHION_MNIST``,
3. the Debian package directory ``/usr/share/datasets/fashion-mnist/``
   (``apt-get install dataset-fashion-mnist``),

where each directory may hold the files directly or in torchvision's
``FashionMNIST/raw`` layout, gzipped (``*.gz``) or plain.  Decoded tensors are cached
in-process, so repeated loads (e.g. across tests) cost nothing.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "SYSTEM_DIR",
    "clear_cache",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Mean and standard deviation of the training pixels after scaling to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Environment variable naming a directory with the IDX files.
ENV_VAR = "VBPC_FASHION_MNIST"
#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}

# IDX type code -> (big-endian numpy dtype, torch dtype).
_IDX_TYPES: dict[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}
_GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------- IDX
def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an IDX file") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None


def read_idx(path: PathLike) -> torch.Tensor:
    """Read one IDX file (http://yann.lecun.com/exdb/mnist/ format), gzipped or plain.

    The header is two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B``
    int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions,
    then one big-endian uint32 per dimension; the payload follows in big-endian C order.

    Returns:
        A tensor of the file's shape and type, in native byte order (a fresh copy).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad magic number, unknown type code, no dimensions, a truncated
            header or corrupt gzip stream, or a payload whose size differs from the size
            the header promises.  The message names the file and the problem.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX header: {len(data)} bytes, need at least 4")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}: the first two bytes must be zero "
            "(not an IDX file?)"
        )
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_TYPES)
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02X} (expected one of {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    np_dtype, torch_dtype = _IDX_TYPES[code]
    itemsize = np.dtype(np_dtype).itemsize
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize
    got = len(data) - header
    if got != expected:
        problem = "truncated payload" if got < expected else "trailing bytes after the payload"
        raise ValueError(
            f"{path}: {problem}: header shape {tuple(shape)} of {np.dtype(np_dtype).name} needs "
            f"{expected} bytes, file has {got}"
        )
    arr = np.frombuffer(data, dtype=np_dtype, offset=header).reshape(shape)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=True)  # native order, writable
    out = torch.from_numpy(arr)
    assert out.dtype == torch_dtype
    return out


# ----------------------------------------------------------------------------- lookup
def _candidate_dirs(root: Optional[PathLike]) -> list[Path]:
    """Directories searched, in order (each base dir and its ``FashionMNIST/raw``)."""
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        bases.append(Path(env).expanduser())
    bases.append(Path(SYSTEM_DIR))
    out: list[Path] = []
    for b in bases:
        for d in (b, b / "FashionMNIST" / "raw"):
            if d not in out:
                out.append(d)
    return out


def _find_in(d: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        p = d / name
        if p.is_file():
            return p
    return None


def find_fashion_mnist(split: str = "train", root: Optional[PathLike] = None) -> tuple[Path, Path]:
    """Paths of the ``(images, labels)`` IDX files of ``split``.

    The first directory (see the module docstring for the order) holding both files
    wins.  Raises ``FileNotFoundError`` naming the install command and every path
    searched when none does.
    """
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    img_stem, lbl_stem, _ = _FILES[split]
    dirs = _candidate_dirs(root)
    for d in dirs:
        img, lbl = _find_in(d, img_stem), _find_in(d, lbl_stem)
        if img is not None and lbl is not None:
            return img, lbl
    searched = "\n  ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"Fashion-MNIST {split} split not found: need {img_stem}[.gz] and {lbl_stem}[.gz] in one of\n"
        f"  {searched}\n"
        f"Install it with `{INSTALL_HINT}` (files go to {SYSTEM_DIR}/), or point the `root` "
        f"argument or ${ENV_VAR} at a directory holding the IDX files."
    )


# ----------------------------------------------------------------------------- loading
@functools.lru_cache(maxsize=4)
def _decode(images: Path, labels: Path, n_expected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded, validated ``(uint8 images (N,28,28), int64 labels (N,))``; cached."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.dtype != torch.uint8 or x.dim() != 3 or tuple(x.shape[1:]) != (28, 28):
        raise ValueError(f"{images}: expected uint8 images of shape (N, 28, 28), got {x.dtype} {tuple(x.shape)}")
    if y.dtype != torch.uint8 or y.dim() != 1:
        raise ValueError(f"{labels}: expected uint8 labels of shape (N,), got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{images} has {x.shape[0]} images but {labels} has {y.shape[0]} labels")
    if x.shape[0] != n_expected:
        raise ValueError(f"{images}: expected {n_expected} images, got {x.shape[0]} (wrong or partial file?)")
    if y.numel() and int(y.max()) > 9:
        raise ValueError(f"{labels}: label {int(y.max())} out of range 0..9")
    return x, y.long()


@functools.lru_cache(maxsize=4)
def _tensors(images: Path, labels: Path, n_expected: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _decode(images, labels, n_expected)
    xf = x.unsqueeze(1).to(torch.float32).div_(255.0)
    if normalize:
        xf.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return xf, y


def load_fashion_mnist(
    split: str = "train", root: Optional[PathLike] = None, normalize: bool = True
) -> TensorDataset:
    """Fashion-MNIST ``split`` (``"train"``: 60000, ``"test"``: 10000 examples).

    Args:
        split: ``"train"`` or ``"test"``.
        root: directory searched first (directly and in ``FashionMNIST/raw``); then
            ``$VBPC_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist``.
        normalize: subtract :data:`FASHION_MNIST_MEAN` and divide by
            :data:`FASHION_MNIST_STD` after scaling the pixels to [0, 1].

    Returns:
        ``TensorDataset(images, labels)``: float32 images of shape ``(N, 1, 28, 28)`` and
        int64 labels in ``0..9``.  The tensors are cached and shared between calls with the
        same arguments: do not modify them in place.

    Raises:
        FileNotFoundError: no searched directory holds the split (the message names
            ``apt-get install dataset-fashion-mnist`` and the paths searched).
        ValueError: a file is corrupt or does not look like Fashion-MNIST.
    """
    images, labels = find_fashion_mnist(split, root)
    x, y = _tensors(images.resolve(), labels.resolve(), _FILES[split][2], bool(normalize))
    return TensorDataset(x, y)


def clear_cache() -> None:
    """Drop the in-process cache of decoded tensors."""
    _tensors.cache_clear()
    _decode.cache_clear()
