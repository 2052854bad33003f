"""Our resize reproduces torch.nn.functional.interpolate (align_corners=False, no antialias)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efficientsam_jax.models.resize import resize, resize_matrix


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("in_hw,out_hw", [((14, 14), (64, 64)), ((300, 200), (256, 256)),
                                          ((64, 64), (480, 720)), ((37, 50), (9, 13)), ((5, 1), (3, 7))])
def test_matches_torch_interpolate(method, in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *in_hw, 3)).astype(np.float32)
  ours = np.asarray(resize(x, out_hw, method))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), out_hw, mode=method,
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("in_hw,out_hw", [((64, 64), (14, 14)), ((37, 50), (9, 13)), ((16, 16), (16, 16))])
def test_area_matches_torch_adaptive_avg_pool(in_hw, out_hw):
  x = np.random.default_rng(1).normal(size=(2, *in_hw, 3)).astype(np.float32)
  ours = np.asarray(resize(x, out_hw, "area"))
  ref = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out_hw).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=2e-6 * np.abs(ref).max())


def test_cubic_kernel_is_pytorch_not_keys_half():
  # Upsampling a step edge by 2: PyTorch's a = -0.75 overshoots more than a = -0.5.
  m = resize_matrix(4, 8, "bicubic")
  assert np.allclose(m.sum(axis=1), 1.0)
  ref = F.interpolate(torch.eye(4)[None, None], (8, 4), mode="bicubic", align_corners=False)[0, 0].numpy()
  np.testing.assert_allclose(m, ref, atol=1e-6)


def test_trailing_spatial_axes_and_identity():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  out = np.asarray(resize(x, (8, 10), "bilinear", spatial_axes=(-2, -1)))
  ref = F.interpolate(torch.from_numpy(x), (8, 10), mode="bilinear", align_corners=False).numpy()
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-5)
  assert resize(x, (4, 5), "bicubic", spatial_axes=(-2, -1)) is x


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown resize method"):
    resize_matrix(4, 8, "nearest")
  with pytest.raises(ValueError, match="positive"):
    resize_matrix(0, 8, "bilinear")
