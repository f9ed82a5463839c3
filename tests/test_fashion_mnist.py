"""Fashion-MNIST: IDX reader, dataset lookup, real-data shapes and a short real IVON run."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vbpc
from vbpc.data import fashion_mnist as fm
from vbpc.data import find_fashion_mnist, load_fashion_mnist, read_idx
from vbpc.models import MLP
from vbpc.training import evaluate, make_loader, train_epoch

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> Path:
    """Write ``arr`` as an IDX file (big-endian), gzipped when ``compress``."""
    header = struct.pack(">HBB", 0, _CODES[arr.dtype.type], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# ----------------------------------------------------------------------------- IDX reader
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, dtype, compress):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", arr, compress))
    assert tuple(out.shape) == arr.shape
    assert out.dtype == torch.from_numpy(arr).dtype
    np.testing.assert_array_equal(out.numpy(), arr)
    out.add_(1)  # writable, native byte order


def test_idx_1d_labels(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / "l.gz", arr, compress=True))
    assert out.tolist() == list(range(10))


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(ValueError, match=r"bad\.idx.*magic"):
        read_idx(p)


def test_idx_unknown_type_code(tmp_path):
    p = tmp_path / "code.idx"
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(ValueError, match=r"code\.idx.*type code 0x07"):
        read_idx(p)


def test_idx_zero_dims(tmp_path):
    p = tmp_path / "nodim.idx"
    p.write_bytes(b"\x00\x00\x08\x00")
    with pytest.raises(ValueError, match=r"nodim\.idx.*0 dimensions"):
        read_idx(p)


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", b"\x00\x00\x08\x03" + struct.pack(">I", 5)])
def test_idx_truncated_header(tmp_path, raw):
    p = tmp_path / "hdr.idx"
    p.write_bytes(raw)
    with pytest.raises(ValueError, match=r"hdr\.idx.*truncated IDX header"):
        read_idx(p)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated_payload(tmp_path, compress):
    good = tmp_path / "good.idx"
    write_idx(good, np.zeros((4, 28, 28), dtype=np.uint8))
    data = good.read_bytes()[:-100]
    p = tmp_path / "short.idx"
    p.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(ValueError, match=r"short\.idx.*truncated payload.*\(4, 28, 28\).*3136 bytes, file has 3036"):
        read_idx(p)


def test_idx_trailing_bytes(tmp_path):
    p = write_idx(tmp_path / "long.idx", np.zeros((2, 3), dtype=np.int32))
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match=r"long\.idx.*trailing bytes"):
        read_idx(p)


def test_idx_truncated_gzip(tmp_path):
    p = write_idx(tmp_path / "cut.gz", np.zeros((50, 28, 28), dtype=np.uint8), compress=True)
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        read_idx(p)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")


# ----------------------------------------------------------------------------- lookup
@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """Hide the system dataset and the environment variable."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", str(tmp_path / "system-none"))
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    return tmp_path


def test_missing_dataset_names_install_command(no_system_data):
    root = no_system_data / "empty"
    root.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("test", root=root)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(root) in msg and str(root / "FashionMNIST" / "raw") in msg
    assert str(no_system_data / "system-none") in msg
    assert "t10k-images-idx3-ubyte" in msg


def _touch_split(d: Path, split: str, gz: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for stem in fm._FILES[split][:2]:
        (d / (stem + (".gz" if gz else ""))).write_bytes(b"")


def test_lookup_order(no_system_data, monkeypatch):
    t = no_system_data
    _touch_split(t / "system-none", "train")
    assert find_fashion_mnist("train")[0].parent == t / "system-none"
    _touch_split(t / "env" / "FashionMNIST" / "raw", "train", gz=False)  # torchvision layout, plain files
    monkeypatch.setenv(fm.ENV_VAR, str(t / "env"))
    img, lbl = find_fashion_mnist("train")
    assert img == t / "env" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert lbl.name == "train-labels-idx1-ubyte"
    _touch_split(t / "root", "train")
    assert find_fashion_mnist("train", root=t / "root")[0] == t / "root" / "train-images-idx3-ubyte.gz"
    # a root holding only one of the two files is skipped
    (t / "half").mkdir()
    (t / "half" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert find_fashion_mnist("train", root=t / "half")[0].parent == t / "env" / "FashionMNIST" / "raw"


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        find_fashion_mnist("val")


def test_corrupt_dataset_file_raises(no_system_data):
    root = no_system_data / "corrupt"
    root.mkdir()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 5))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(10000, dtype=np.uint8), compress=True)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*truncated IDX header"):
        load_fashion_mnist("test", root=root)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_mlp_shapes(activation):
    m = MLP(hidden=(32, 16), activation=activation, dropout=0.1)
    assert m(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert [n for n, _ in vbpc.select_parameters(m, "last_layer")] == ["layers.6.weight", "layers.6.bias"]
    assert MLP(in_features=6, hidden=(), out_features=3)(torch.randn(2, 6)).shape == (2, 3)
    with pytest.raises(ValueError, match="activation"):
        MLP(activation="sigmoid")
    with pytest.raises(ValueError, match="784"):
        MLP()(torch.randn(2, 100))


# ----------------------------------------------------------------------------- training helpers
def _toy(n: int = 64):
    x = torch.randn(n, 1, 4, 4)
    y = (x.flatten(1).sum(1) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def test_train_epoch_and_evaluate_mean():
    ds = _toy()
    model = MLP(in_features=16, hidden=(8,), out_features=4)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=len(ds), hess_init=0.5, mc_samples=2)
    loader = make_loader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(list(loader)) == 4
    loss = train_epoch(model, opt, loader, F.cross_entropy, progress=False)
    assert math.isfinite(loss) and opt.current_step == 4
    res = evaluate(model, make_loader(ds, 64))
    with torch.no_grad():
        logits = model(ds.tensors[0])
    assert res["nll"] == pytest.approx(float(F.cross_entropy(logits, ds.tensors[1])), rel=1e-5)
    assert res["accuracy"] == pytest.approx(float((logits.argmax(1) == ds.tensors[1]).float().mean()))
    # any closure-taking optimizer works
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    assert math.isfinite(train_epoch(model, sgd, loader, F.cross_entropy, progress=False))


@pytest.mark.parametrize("named", [True, False])
def test_evaluate_bma_matches_manual_average(named):
    ds = _toy(32)
    model = MLP(in_features=16, hidden=(8,), out_features=4)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=len(ds), hess_init=0.5)
    train_epoch(model, opt, make_loader(ds, 8), F.cross_entropy, progress=False)
    post = opt.posterior(model) if named else opt.posterior()  # positional names: own binding
    res = evaluate(model, make_loader(ds, 32), posterior=post, n_samples=5,
                   generator=torch.Generator().manual_seed(3))
    stacked = post.sample_stack(5, torch.Generator().manual_seed(3))  # the draws predict() makes
    probs = []
    with torch.no_grad():
        for s in range(5):
            with post.sampled(theta={k: v[s] for k, v in stacked.items()}):
                probs.append(F.softmax(model(ds.tensors[0]), dim=-1))
    avg = torch.stack(probs).mean(0)
    y = ds.tensors[1]
    assert res["nll"] == pytest.approx(float(-avg[torch.arange(len(y)), y].log().mean()), rel=1e-5)
    assert res["accuracy"] == pytest.approx(float((avg.argmax(1) == y).float().mean()))
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(model, make_loader(ds, 32), posterior=post, n_samples=0)


# ----------------------------------------------------------------------------- real data
_REAL_DIR = Path(fm.SYSTEM_DIR)  # captured before any test hides it
requires_data = pytest.mark.skipif(
    not (_REAL_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed in {fm.SYSTEM_DIR} (apt-get install dataset-fashion-mnist)",
)


@requires_data
def test_real_shapes_and_labels():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    for ds, n in ((train, 60000), (test, 10000)):
        x, y = ds.tensors
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) == 0 and int(y.max()) == 9
        assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10  # balanced classes
    x = train.tensors[0]
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3  # documented statistics
    raw = load_fashion_mnist("test", normalize=False).tensors[0]
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0
    assert load_fashion_mnist("train").tensors[0] is x  # cached in-process


@requires_data
def test_real_files_in_torchvision_root(no_system_data):
    """A torchvision root (the directory that contains ``FashionMNIST/raw/``) holding copies of the Debian files."""
    root = no_system_data / "tv"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in fm._FILES["test"][:2]:
        (raw / (stem + ".gz")).write_bytes((_REAL_DIR / (stem + ".gz")).read_bytes())
    img, lbl = find_fashion_mnist("test", root=root)
    assert (img, lbl) == (raw / "t10k-images-idx3-ubyte.gz", raw / "t10k-labels-idx1-ubyte.gz")
    x, y = load_fashion_mnist("test", root=root).tensors
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y, minlength=10).tolist() == [1000] * 10
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):  # the system dir is hidden
        load_fashion_mnist("train", root=root)


@requires_data
def test_real_file_with_corrupt_header(no_system_data):
    root = no_system_data / "bad"
    root.mkdir()
    for stem in fm._FILES["test"][:2]:
        data = gzip.decompress((_REAL_DIR / (stem + ".gz")).read_bytes())
        if stem.startswith("t10k-images"):
            data = data[:2] + b"\x0a" + data[3:]  # type code 0x08 -> 0x0A (not an IDX type)
        (root / stem).write_bytes(data)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: unknown IDX data type code 0x0A"):
        load_fashion_mnist("test", root=root)


@requires_data
@pytest.mark.slow
def test_real_ivon_training_run():
    """One epoch of IVON on the real training set; mean weights reach >= 0.78 test accuracy."""
    torch.manual_seed(0)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    model = MLP()
    # batch 256 halves the steps (IVON's per-step cost is fixed) and keeps this near 10 s on 2 cores
    opt = vbpc.IVON(model.parameters(), lr=0.3, ess=len(train), hess_init=0.2, weight_decay=1e-4)
    loader = make_loader(train, 256, shuffle=True, generator=torch.Generator().manual_seed(0))
    loss = train_epoch(model, opt, loader, F.cross_entropy, progress=False)
    assert math.isfinite(loss) and loss < 1.0

    test_loader = make_loader(test, 1000)
    mean = evaluate(model, test_loader)
    assert mean["accuracy"] >= 0.78, mean
    before = [p.detach().clone() for p in model.parameters()]
    post = opt.posterior(model)
    bma = evaluate(model, test_loader, posterior=post, n_samples=4, generator=torch.Generator().manual_seed(1))
    print(f"IVON 1 epoch: mean {mean}, BMA(4) {bma}")
    assert math.isfinite(bma["nll"]) and bma["nll"] > 0, bma
    assert bma["accuracy"] >= 0.75, bma
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # samples were undone
    assert model.training  # evaluate restores the mode
