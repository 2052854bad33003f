"""Predictor demo on a bundled photograph with a random-weight (UNTRAINED) EfficientSAM.

Needs no download: ``python -m efficientsam_jax.main --config=configs/predict_demo.py --workdir=DIR``.
Variants: ``:ti`` (default), ``:s``. It exercises the whole inference path
(encoder, prompt encoder, decoder, bicubic upsampling, overlay) on real image data.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = "predict_demo"
  config.variant = arg or "ti"
  config.seed = 0
  # Optional path to a JSON model config (EfficientSamConfig keys) instead of a variant.
  config.model_config = ""
  return config
