"""Inference helpers: the SAM-style predictor for EfficientSAM."""

from efficientsam_jax.inference.predictor import EfficientSamPredictor, to_rgb_uint8

__all__ = ["EfficientSamPredictor", "to_rgb_uint8"]
