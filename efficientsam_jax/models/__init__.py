from efficientsam_jax.models.efficient_sam import (EfficientSam, EfficientSamConfig, forward,
                                                   get_image_embeddings, init_params, predict_masks)
