"""Dataset-shift corruptions (``vbpc.data.shift``) on real Fashion-MNIST test images, against
independent references: ``torch.rot90``, closed-form moments and a float64 direct convolution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vbpc.data import load_fashion_mnist
from vbpc.data.shift import SHIFT_LEVELS, corrupt, shifted_fashion_mnist


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_fashion_mnist("test", normalize=False).tensors[0][:64]


@pytest.mark.parametrize("family,level", [("rotation", 0.0), ("rotation", 360.0), ("gaussian_noise", 0.0),
                                          ("contrast", 1.0), ("blur", 0.0)])
def test_identity_levels_are_bitwise(images, family, level):
    out = corrupt(images, family, level)
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_quarter_turns_equals_rot90(images, k):
    out = corrupt(images, "rotation", 90.0 * k)
    torch.testing.assert_close(out, torch.rot90(images, k, dims=(-2, -1)), rtol=0, atol=1e-5)


def test_rotation_moves_the_image_and_stays_in_range(images):
    for lv in SHIFT_LEVELS["rotation"]:
        out = corrupt(images, "rotation", lv)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        assert (out - images).abs().mean() > 0.02


def test_gaussian_noise_has_the_level_as_std_and_is_reproducible():
    x = torch.full((200, 1, 28, 28), 0.5)  # mid-grey: no clipping at sigma <= 0.12
    for lv in (0.04, 0.08, 0.12):
        d = corrupt(x, "gaussian_noise", lv, generator=torch.Generator().manual_seed(0)) - x
        assert abs(float(d.std()) - lv) < 0.01 * lv  # 156,800 draws: relative SE 0.18%
        assert abs(float(d.mean())) < 4 * lv / math.sqrt(d.numel())
    a = corrupt(x, "gaussian_noise", 0.2, generator=torch.Generator().manual_seed(3))
    b = corrupt(x, "gaussian_noise", 0.2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_contrast_scales_the_deviation_from_each_images_mean(images):
    out = corrupt(images, "contrast", 0.3)
    mean = images.double().mean(dim=(1, 2, 3), keepdim=True)
    ref = (mean + 0.3 * (images.double() - mean)).clamp(0, 1)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=1e-6)  # nothing clipped


def test_blur_matches_a_float64_direct_convolution(images):
    sigma = 1.5
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(k1, k1) / k1.sum() ** 2  # the separable kernel as one 2-D kernel
    x = images.double()
    ref = F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k2.view(1, 1, *k2.shape))
    torch.testing.assert_close(corrupt(images, "blur", sigma).double(), ref, rtol=0, atol=1e-5)


def test_shifted_test_set_is_normalised_like_the_loader():
    clean = load_fashion_mnist("test")
    ds = shifted_fashion_mnist("contrast", 1.0)
    assert torch.allclose(ds.tensors[0], clean.tensors[0], atol=1e-6) and torch.equal(ds.tensors[1], clean.tensors[1])


def test_bad_input(images):
    with pytest.raises(ValueError, match="did you mean 'rotation'"):
        corrupt(images, "rotate", 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(load_fashion_mnist("test").tensors[0][:4], "blur", 1.0)  # normalised images
    with pytest.raises(ValueError, match="level"):
        corrupt(images, "contrast", 1.5)
    with pytest.raises(ValueError, match="level"):
        corrupt(images, "gaussian_noise", float("nan"))
    with pytest.raises(ValueError, match="level"):
        corrupt(images, "blur", -1.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corrupt(images[0], "blur", 1.0)
