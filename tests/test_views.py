"""SAMI views: RandomResizedCrop statistics, reproducibility, rendering and flips."""

import numpy as np
import pytest
import skimage.data

from efficientsam_jax.data.views import View, render_view, sample_view, view_rng


def test_crops_respect_scale_ratio_and_bounds():
  rng = np.random.default_rng(0)
  views = [sample_view(rng, (480, 640)) for _ in range(2000)]
  areas = np.array([v.height * v.width / (480 * 640) for v in views])
  aspects = np.array([v.width / v.height for v in views])
  assert all(0 <= v.top and v.top + v.height <= 480 and 0 <= v.left and v.left + v.width <= 640 for v in views)
  assert areas.min() >= 0.19 and areas.max() <= 1.0
  assert aspects.min() >= 0.74 and aspects.max() <= 1.35
  assert 0.45 < np.mean([v.flip for v in views]) < 0.55
  # Areas are drawn uniformly in [0.2, 1]; retries only replace crops too large to fit,
  # so at least half fall below the midpoint, and both ends of the range occur.
  assert (areas < 0.6).mean() > 0.5 and areas.min() < 0.25 and areas.max() > 0.9


def test_fallback_is_a_centred_crop_within_the_ratio():
  class NoLuck:  # an rng whose areas never fit (scale > 1 of a thin image)
    def random(self):
      return 0.9
    def uniform(self, low, high):
      return high * 10
    def integers(self, low, high):
      raise AssertionError("no attempt should succeed")
  view = sample_view(NoLuck(), (100, 1000))
  assert view == View(top=0, left=(1000 - 133) // 2, height=100, width=133, flip=False)


def test_views_are_reproducible_per_source_and_index():
  a = sample_view(view_rng(0, "n01440764_10026", 3), (375, 500))
  assert a == sample_view(view_rng(0, "n01440764_10026", 3), (375, 500))
  others = {sample_view(view_rng(0, "n01440764_10026", i), (375, 500)) for i in range(8)}
  assert len(others) == 8


def test_render_and_flip():
  image = skimage.data.astronaut()
  view = View(top=10, left=20, height=200, width=300, flip=False)
  out = render_view(image, view, 224)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  flipped = render_view(image, View(10, 20, 200, 300, True), 224)
  np.testing.assert_array_equal(flipped, out[:, ::-1])
  whole = render_view(image, View(0, 0, 512, 512, False), 512)
  np.testing.assert_array_equal(whole, image)  # identity crop and size
  with pytest.raises(ValueError, match="empty image"):
    sample_view(np.random.default_rng(0), (0, 10))
