"""MNIST/CIFAR-10 through torchvision (offline), the scikit-learn digits OOD set, seeding and make_loader."""

from __future__ import annotations

import gzip
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

import vbpc.training
from vbpc.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_cifar10,
    load_digits_ood,
    load_fashion_mnist,
    load_mnist,
    make_dataloader,
    make_loader,
    seed_everything,
    seed_worker,
    vision,
)
from vbpc.data import fashion_mnist as fm


# ----------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("loader, layout", [(load_mnist, "MNIST/raw"), (load_cifar10, "cifar-10-batches-py")])
def test_torchvision_missing_files_are_a_clear_error(tmp_path, loader, layout):
    root = tmp_path / "no-data"
    with pytest.raises(FileNotFoundError) as info:
        loader(root, "test")  # download=False: nothing is fetched
    msg = str(info.value)
    assert f"under root {root}" in msg and f"{root}/{layout}" in msg
    assert "download=True" in msg and "network" in msg and "place the files there" in msg
    with pytest.raises(ValueError, match="split"):
        loader(root, "val")


def test_default_torchvision_root_is_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VBPC_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "torchvision")):
        load_mnist(split="test")


def test_mnist_reads_torchvision_layout(tmp_path):
    """The real Fashion-MNIST test IDX files placed in torchvision's MNIST layout go through torchvision."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / stem).write_bytes(gzip.decompress(Path(fm.SYSTEM_DIR, stem + ".gz").read_bytes()))
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / stem).write_bytes(b"")  # torchvision checks all four exist; only the test split is read
    x, y = load_mnist(tmp_path, "test").tensors
    fx, fy = load_fashion_mnist("test", normalize=False).tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, fy)
    torch.testing.assert_close(x, (fx - MNIST_MEAN) / MNIST_STD)
    assert torch.equal(load_mnist(tmp_path, "test", normalize=False).tensors[0], fx)


# ----------------------------------------------------------------------------- digits OOD
def test_digits_ood():
    x, y = load_digits_ood().tensors
    assert x.shape == (1797, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    raw = load_digits_ood(normalize=None).tensors[0]
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0  # bilinear upsampling stays in [0, 1]
    assert abs(float(raw.mean()) - 0.3053) < 1e-3
    torch.testing.assert_close(x, (raw - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)
    small = load_digits_ood(size=8, normalize=None).tensors[0]
    from sklearn.datasets import load_digits

    assert torch.equal(small[:, 0], torch.from_numpy(load_digits().images.astype(np.float32) / 16))
    torch.testing.assert_close(raw, F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="normalize"):
        load_digits_ood(normalize="cifar10")
    with pytest.raises(ValueError, match="size"):
        load_digits_ood(size=0)


def test_digits_without_sklearn(monkeypatch):
    vision.clear_vision_cache()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    try:
        with pytest.raises(ImportError, match=r"pip install scikit-learn"):
            load_digits_ood()
    finally:
        vision.clear_vision_cache()


# ----------------------------------------------------------------------------- seeding and loaders
def test_seed_everything():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(7)
    a = draw()
    seed_everything(7)
    assert draw() == a
    seed_everything(8)
    assert draw() != a
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_seed_everything_deterministic_flag(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "placeholder")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # restored (removed) after the test
    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False


def test_seed_worker_seeds_numpy_and_random():
    torch.manual_seed(123)
    seed_worker(0)
    a = (random.random(), float(np.random.rand()))
    torch.manual_seed(123)
    seed_worker(5)
    assert (random.random(), float(np.random.rand())) == a


def _toy(n: int = 50) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


def _order(loader) -> list[int]:
    return [int(i) for _, y in loader for i in y]


def test_make_loader_is_the_one_loader():
    assert vbpc.training.make_loader is make_loader is make_dataloader


def test_make_loader_seeded_shuffling():
    ds = _toy()
    a = make_loader(ds, 8, shuffle=True, seed=1)
    first, second = _order(a), _order(a)
    assert sorted(first) == list(range(50)) and first != second  # reshuffled each epoch
    b = make_loader(ds, 8, shuffle=True, seed=1)
    assert _order(b) == first and _order(b) == second
    assert _order(make_loader(ds, 8, shuffle=True, generator=torch.Generator().manual_seed(1))) == first
    assert _order(make_loader(ds, 8)) == list(range(50))
    batches = [len(y) for _, y in make_loader(ds, 8, drop_last=True)]
    assert batches == [8] * 6
    with pytest.raises(ValueError, match="either generator or seed"):
        make_loader(ds, 8, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0)


def test_make_loader_workers_give_the_same_batches():
    ds = _toy()
    ref = make_loader(ds, 8, shuffle=True, seed=3)
    par = make_loader(ds, 8, shuffle=True, seed=3, num_workers=2)
    assert par.persistent_workers and par.worker_init_fn is seed_worker
    assert _order(par) == _order(ref) and _order(par) == _order(ref)  # two epochs


def test_make_loader_pin_memory_only_for_cuda():
    ds = _toy()
    assert not make_loader(ds, 8).pin_memory
    assert not make_loader(ds, 8, device="cpu").pin_memory
    assert make_loader(ds, 8, device="cuda").pin_memory
    assert make_loader(ds, 8, device=torch.device("cuda", 0)).pin_memory


class _PerItem(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        if not isinstance(i, int):
            raise TypeError("per-example dataset")
        return torch.tensor([float(i)]), i


def test_make_loader_per_example_datasets():
    xs = [x for x, _ in make_loader(_PerItem(), 4)]
    assert [tuple(x.shape) for x in xs] == [(4, 1), (4, 1), (2, 1)]  # default collation
    with pytest.raises(TypeError, match="per-example"):
        next(iter(make_loader(_PerItem(), 4, batched=True)))
