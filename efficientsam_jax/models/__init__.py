"""EfficientSAM models; the official entry points are in ``efficient_sam``."""

from efficientsam_jax.models.efficient_sam import (EfficientSam, EfficientSamConfig, forward,
                                                   get_image_embeddings, init_params, predict_masks)

__all__ = ["EfficientSam", "EfficientSamConfig", "forward", "get_image_embeddings", "init_params",
           "predict_masks"]
